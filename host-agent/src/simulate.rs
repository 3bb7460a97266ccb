//! `flowshard simulate`: the agent's plan stage and forecaster driving the emulated NIC
//! through days of traffic in virtual time, once per policy, with the same traffic.
//!
//! Every control interval (a tick):
//! 1. **traffic** — flows arrive per class at the rate a real load curve gives (Poisson
//!    arrivals, lognormal lifetimes); each flow's rate, size and protocol come from a
//!    flow of the real captures. Every live flow sends one packet through the NIC per
//!    tick (its first one when it starts, an RST when it ends), so the NIC's connection
//!    table and steering decide every flow's node, packet by packet; a flow of a
//!    sharded class sends one per member of its group, each for an equal share of its
//!    load, as its many flowlets in a tick would spread it.
//! 2. **nodes** — each node serves what its flows offer up to its capacity, queues the
//!    rest up to `queue_s` of work and drops beyond; a packet's queueing delay is the
//!    drain time of the backlog it meets (which grows or drains linearly over the
//!    tick) plus M/M/1 waiting at the node's utilisation. A failed node serves
//!    nothing until the agent notices (next tick) and the NIC remaps its flows.
//! 3. **agent** — the measured loads feed the forecaster (per class and in total), the
//!    planner decides, and the decision goes to the NIC as one command-ring batch:
//!    node states, shard moves, class groups.
//!
//! The checker follows every flow: a flow whose node changed is counted as moved with
//! handoff (the agent had handed its state over), remapped (its node failed), flowlet
//! sharded (its class spreads over several shards), or **broken**. Seeds fix the
//! traffic, so the policies meet identical flows and a run repeats exactly.
//!
//! Model limits, stated: a packet per flow per tick stands for the flow's rate
//! (counters on the NIC count the packets it saw, the nodes count the load), and a
//! sharded flow's load splits evenly over its group, as it does once it has many
//! flowlets per tick (one that sends a single burst a tick would not spread); node
//! warm-up is a delay with no partial service; the forecaster's starting history is
//! the load curve itself before the window (what an agent running for weeks would
//! have measured), without per-flow noise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hdl_bindings::ring::{CmdDesc, Opcode, Status};
use hw_sim::device::{DeviceOptions, NicDevice};
use hw_sim::generate::{FRAME_LEN, WIRE_LEN, write_ipv4_frame};
use nic_firmware::config::{NodeConfig, NodeState, Timeouts};
use nic_firmware::pipeline::{Decision, Packet};
use nic_firmware::{Class, LinkType, PipelineConfig, Verdict, ipproto};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, LogNormal, Poisson};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::device::InProcess;
use crate::driver::Nic;
use crate::forecast::{self, Model};
use crate::planner::{Actions, Inputs, NodeInput, Planner, PlannerConfig, Policy, Power};

/// The embedded default scenario.
pub const DEFAULT_SCENARIO: &str = include_str!("../scenarios/default.toml");

/// Longest flow lifetime drawn.
const MAX_LIFETIME_S: f64 = 86_400.0;
/// Spread of the lognormal lifetimes: heavy-tailed, so a flow's age says something
/// about how long it will last (which is what makes handing off old flows worth it).
const LIFETIME_SIGMA: f64 = 1.2;
/// Quantile points per node and tick in the delay distribution.
const DELAY_POINTS: usize = 50;
/// Time points per node and tick at which a changing backlog is sampled.
const DELAY_TIMES: usize = 24;
/// Delay histogram: 20 buckets per decade from 1 µs to 1000 s.
const HIST_PER_DECADE: f64 = 20.0;
const HIST_BUCKETS: usize = 180;

// ---- scenario -------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub seed: u64,
    pub duration_hours: f64,
    #[serde(default = "default_warmup_hours")]
    pub warmup_hours: f64,
    pub interval_s: u32,
    #[serde(default = "default_shards")]
    pub shards: u16,
    /// Connection-table entries of the emulated NIC. Too few evict established flows,
    /// which come back as new flows wherever their shard is now: broken.
    #[serde(default = "default_nic_flows")]
    pub nic_flow_capacity: u32,
    pub nodes: NodesSpec,
    pub load: LoadSpec,
    pub traffic: TrafficSpec,
    #[serde(default)]
    pub planner: PlannerConfig,
    #[serde(default)]
    pub forecast: ForecastSpec,
    #[serde(default)]
    pub migration: MigrationSpec,
    #[serde(default)]
    pub events: Vec<Event>,
}

fn default_warmup_hours() -> f64 {
    3.0
}

fn default_shards() -> u16 {
    256
}

fn default_nic_flows() -> u32 {
    1 << 18
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodesSpec {
    pub count: u16,
    pub capacity_pps: f64,
    pub warmup_s: u32,
    pub queue_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    pub csv: PathBuf,
    pub column: Option<String>,
    pub sample_s: u32,
    pub start_day: f64,
    pub history_days: f64,
    pub peak_fraction: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Captures,
    Synthetic,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficSpec {
    pub source: Source,
    #[serde(default)]
    pub captures: Option<PathBuf>,
    pub flows_at_peak: u32,
    pub max_flow_share: f64,
    pub classes: Vec<ClassMix>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassMix {
    pub class: Class,
    pub share: f64,
    pub mean_lifetime_s: f64,
    #[serde(default)]
    pub shift_hours: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForecastSpec {
    pub level: f64,
    pub refit_ticks: usize,
}

impl Default for ForecastSpec {
    fn default() -> Self {
        ForecastSpec {
            level: 0.8,
            refit_ticks: 6,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationSpec {
    pub hand_off: bool,
    pub min_age_s: f64,
    pub state_bytes: u64,
    pub duration_ms: f64,
    pub max_per_tick: usize,
}

impl Default for MigrationSpec {
    fn default() -> Self {
        MigrationSpec {
            hand_off: true,
            min_age_s: 600.0,
            state_bytes: 4096,
            duration_ms: 20.0,
            max_per_tick: 500,
        }
    }
}

/// Something that happens at `at_hours` into the window.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The node stops serving and answering.
    Fail { at_hours: f64, node: u16 },
    /// The node answers again (standing by until the planner uses it).
    Recover { at_hours: f64, node: u16 },
    /// The node serves only `factor` of its capacity for `hours` (thermal
    /// throttling, a noisy neighbour, a flapping port) while still stating all of it:
    /// only its queueing delay and drops show it.
    Degrade {
        at_hours: f64,
        node: u16,
        factor: f64,
        hours: f64,
    },
    /// A class's arrivals multiply by `factor` for `hours`.
    FlashCrowd {
        at_hours: f64,
        class: Class,
        factor: f64,
        hours: f64,
    },
}

impl Event {
    fn at_hours(&self) -> f64 {
        match self {
            Event::Fail { at_hours, .. }
            | Event::Recover { at_hours, .. }
            | Event::Degrade { at_hours, .. }
            | Event::FlashCrowd { at_hours, .. } => *at_hours,
        }
    }
}

impl Scenario {
    /// Parse and check a scenario; `what` names it in errors.
    pub fn parse(text: &str, what: &str) -> Result<Scenario, Error> {
        let s: Scenario =
            toml::from_str(text).map_err(|e| Error::Usage(format!("scenario {what}: {e}")))?;
        s.validate()
            .map_err(|e| Error::Usage(format!("scenario {what}: {e}")))?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(format!("{name} must be a positive number, got {v}"))
            }
        };
        positive("duration_hours", self.duration_hours)?;
        if !(self.warmup_hours >= 0.0 && self.warmup_hours.is_finite()) {
            return Err(format!(
                "warmup_hours must be ≥ 0, got {}",
                self.warmup_hours
            ));
        }
        if self.interval_s == 0 || self.interval_s > 3_600 {
            return Err(format!(
                "interval_s must lie in 1..=3600 (the NIC's idle timeouts must outlast a tick), got {}",
                self.interval_s
            ));
        }
        if self.nic_flow_capacity == 0 {
            return Err("nic_flow_capacity must be at least 1".into());
        }
        if self.shards == 0 {
            return Err("shards must be at least 1".into());
        }
        if self.nodes.count == 0 || usize::from(self.nodes.count) > nic_firmware::config::MAX_NODES
        {
            return Err(format!(
                "nodes.count must lie in 1..={}, got {}",
                nic_firmware::config::MAX_NODES,
                self.nodes.count
            ));
        }
        positive("nodes.capacity_pps", self.nodes.capacity_pps)?;
        positive("nodes.queue_s", self.nodes.queue_s)?;
        if self.load.sample_s == 0 {
            return Err("load.sample_s must be at least 1".into());
        }
        positive("load.peak_fraction", self.load.peak_fraction)?;
        if !(self.load.start_day >= self.load.history_days && self.load.history_days >= 0.0) {
            return Err(format!(
                "load.start_day ({}) must be at least load.history_days ({}): the history comes before the window",
                self.load.start_day, self.load.history_days
            ));
        }
        if self.traffic.flows_at_peak == 0 {
            return Err("traffic.flows_at_peak must be at least 1".into());
        }
        positive("traffic.max_flow_share", self.traffic.max_flow_share)?;
        if self.traffic.source == Source::Captures && self.traffic.captures.is_none() {
            return Err(
                "traffic.captures names the capture directory when source = \"captures\"".into(),
            );
        }
        if self.traffic.classes.is_empty() {
            return Err("traffic.classes lists at least one class".into());
        }
        for (i, c) in self.traffic.classes.iter().enumerate() {
            positive(&format!("traffic.classes[{i}].share"), c.share)?;
            positive(
                &format!("traffic.classes[{i}].mean_lifetime_s"),
                c.mean_lifetime_s,
            )?;
            if self.traffic.classes[..i].iter().any(|o| o.class == c.class) {
                return Err(format!(
                    "traffic.classes[{i}]: class {} appears twice",
                    c.class.as_str()
                ));
            }
        }
        if !(self.forecast.level > 0.0 && self.forecast.level < 1.0) {
            return Err(format!(
                "forecast.level must lie strictly between 0 and 1, got {}",
                self.forecast.level
            ));
        }
        if self.forecast.refit_ticks == 0 {
            return Err("forecast.refit_ticks must be at least 1".into());
        }
        self.planner.validate()?;
        if self.planner.min_active > usize::from(self.nodes.count) {
            return Err(format!(
                "planner.min_active ({}) exceeds nodes.count ({})",
                self.planner.min_active, self.nodes.count
            ));
        }
        for (i, e) in self.events.iter().enumerate() {
            if !(e.at_hours() >= 0.0 && e.at_hours().is_finite()) {
                return Err(format!("events[{i}].at_hours must be ≥ 0"));
            }
            match e {
                Event::Fail { node, .. }
                | Event::Recover { node, .. }
                | Event::Degrade { node, .. }
                    if *node >= self.nodes.count =>
                {
                    return Err(format!(
                        "events[{i}]: node {node} does not exist (nodes.count = {})",
                        self.nodes.count
                    ));
                }
                Event::Degrade { factor, hours, .. }
                    if !(*factor > 0.0 && *factor <= 1.0 && *hours > 0.0) =>
                {
                    return Err(format!(
                        "events[{i}]: a degradation needs 0 < factor ≤ 1 and hours > 0"
                    ));
                }
                Event::FlashCrowd { factor, hours, .. } if !(*factor > 0.0 && *hours > 0.0) => {
                    return Err(format!(
                        "events[{i}]: a flash crowd needs factor > 0 and hours > 0"
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn ticks(&self) -> (usize, usize) {
        let per_hour = 3600.0 / f64::from(self.interval_s);
        (
            (self.warmup_hours * per_hour).round() as usize,
            (self.duration_hours * per_hour).round().max(1.0) as usize,
        )
    }

    fn warmup_ticks(&self) -> u64 {
        u64::from(self.nodes.warmup_s.div_ceil(self.interval_s))
    }
}

// ---- load curve -----------------------------------------------------------------------

/// The load curve at the tick interval, normalised to the window's peak, with the
/// history before the window and room for class shifts on both sides.
#[derive(Clone, Debug)]
struct Curve {
    /// Values at `interval_s` steps; index `origin` is the window's first tick.
    values: Vec<f64>,
    origin: usize,
    name: String,
}

impl Curve {
    fn load(s: &Scenario, csv: &Path, column: Option<&str>) -> Result<Curve, Error> {
        let file = std::fs::File::open(csv).map_err(|source| Error::Io {
            what: format!(
                "load curve {} (run `make setup` to fetch the data, or give --load-csv)",
                csv.display()
            ),
            source,
        })?;
        let (name, raw) = crate::forecast_csv::read_series(csv, file, column)?;
        let step = f64::from(s.interval_s) / f64::from(s.load.sample_s);
        let per_day = 86_400.0 / f64::from(s.interval_s);
        let max_shift = s
            .traffic
            .classes
            .iter()
            .map(|c| c.shift_hours.abs())
            .fold(0.0, f64::max);
        let shift_ticks = (max_shift * 3600.0 / f64::from(s.interval_s)).ceil() as usize;
        let (warm, run) = s.ticks();
        let history = (s.load.history_days * per_day).round() as usize;
        let before = history.max(warm) + shift_ticks;
        let start_tick = (s.load.start_day * per_day).round() as usize;
        if start_tick < before {
            return Err(Error::Usage(format!(
                "{}: the window starts {} ticks in, but history, warm-up and class shifts need {before} before it",
                csv.display(),
                start_tick
            )));
        }
        let first = start_tick - before;
        let len = before + run + shift_ticks + 1;
        let at = |tick: usize| -> Option<f64> {
            let x = tick as f64 * step;
            let i = x.floor() as usize;
            let f = x - i as f64;
            let a = *raw.get(i)?;
            let b = raw.get(i + 1).copied().unwrap_or(a);
            Some(a + (b - a) * f)
        };
        let mut values = Vec::with_capacity(len);
        for t in first..first + len {
            values.push(at(t).ok_or_else(|| {
                Error::Usage(format!(
                    "{}: {} rows at {} s cover {:.1} days; the scenario needs {:.1} (start_day + duration + shifts)",
                    csv.display(),
                    raw.len(),
                    s.load.sample_s,
                    raw.len() as f64 * f64::from(s.load.sample_s) / 86_400.0,
                    (first + len) as f64 / per_day
                ))
            })?);
        }
        if let Some(i) = values.iter().position(|v| *v < 0.0) {
            return Err(Error::Usage(format!(
                "{}: the load curve goes negative ({}) near row {}",
                csv.display(),
                values[i],
                ((first + i) as f64 * step) as usize + 2
            )));
        }
        let peak = values[before..before + run]
            .iter()
            .copied()
            .fold(0.0, f64::max);
        if peak <= 0.0 {
            return Err(Error::Usage(format!(
                "{}: the load curve is zero over the simulated window",
                csv.display()
            )));
        }
        for v in &mut values {
            *v /= peak;
        }
        Ok(Curve {
            values,
            origin: before,
            name: format!("{} ({name})", csv.display()),
        })
    }

    /// The curve at tick `t` of the window (negative: history), shifted by `lag` ticks.
    fn at(&self, t: i64, lag: i64) -> f64 {
        let i = (self.origin as i64 + t - lag).clamp(0, self.values.len() as i64 - 1);
        self.values[i as usize]
    }
}

// ---- flow templates -------------------------------------------------------------------

/// A real flow's shape: its rate, protocol and server port.
#[derive(Clone, Copy, Debug)]
struct Template {
    pps: f64,
    proto: u8,
    server_port: u16,
}

#[derive(Clone, Debug)]
struct Templates {
    by_class: Vec<Vec<Template>>,
    /// Where the classes came from, for the report.
    source: String,
}

impl Templates {
    fn load(s: &Scenario) -> Result<Templates, Error> {
        let mut by_class = vec![Vec::new(); Class::COUNT];
        let source = match s.traffic.source {
            Source::Synthetic => {
                let mut rng = StdRng::seed_from_u64(s.seed ^ 0x7e3a);
                let rates = LogNormal::new(3.0, 1.0).map_err(|e| Error::Usage(e.to_string()))?;
                for (c, list) in by_class.iter_mut().enumerate() {
                    for _ in 0..1000 {
                        list.push(Template {
                            pps: rates.sample(&mut rng),
                            proto: ipproto::TCP,
                            server_port: 1000 + c as u16,
                        });
                    }
                }
                "synthetic lognormal rates".to_string()
            }
            Source::Captures => {
                let dir = s
                    .traffic
                    .captures
                    .as_ref()
                    .map(|p| resolve(p))
                    .unwrap_or_default();
                let files = capture_files(&dir)?;
                let tables = crate::profiler::nic_tables(None).ok();
                let classed_by = if tables.is_some() {
                    "the NIC's profiler tables"
                } else {
                    "port rules (profiler tables unreadable)"
                };
                let mut flows = 0;
                for f in &files {
                    let (list, _) = crate::flows::collect(
                        f,
                        &PipelineConfig::default(),
                        tables.clone(),
                        |_, _, _| Ok(()),
                    )?;
                    for fl in list {
                        let dur = (fl.last_ts_ns.saturating_sub(fl.first.first_ts_ns)) as f64 / 1e9;
                        if fl.packets < 2 {
                            continue;
                        }
                        let class = fl.nic_class.unwrap_or(Class::Other) as usize;
                        by_class[class].push(Template {
                            pps: fl.packets as f64 / dur.max(1.0),
                            proto: if fl.first.proto == ipproto::TCP {
                                ipproto::TCP
                            } else {
                                ipproto::UDP
                            },
                            server_port: fl.first.server_port,
                        });
                        flows += 1;
                    }
                }
                if flows == 0 {
                    return Err(Error::Usage(format!(
                        "{}: no flow of two packets or more in {} capture files",
                        dir.display(),
                        files.len()
                    )));
                }
                format!(
                    "{flows} flows of {} captures in {}, classed by {classed_by}",
                    files.len(),
                    dir.display()
                )
            }
        };
        // A class with no flow of its own borrows the whole mix's shapes.
        let all: Vec<Template> = by_class.iter().flatten().copied().collect();
        for list in &mut by_class {
            if list.is_empty() {
                list.clone_from(&all);
            }
        }
        Ok(Templates { by_class, source })
    }

    fn mean_pps(&self, c: Class) -> f64 {
        let l = &self.by_class[c as usize];
        l.iter().map(|t| t.pps).sum::<f64>() / l.len().max(1) as f64
    }
}

/// A relative path is in the set-up's data directory.
fn resolve(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        crate::profiler::data_dir().join(p)
    }
}

fn capture_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    if dir.is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let rd = std::fs::read_dir(dir).map_err(|source| Error::Io {
        what: format!(
            "capture directory {} (run `make setup` to fetch the captures)",
            dir.display()
        ),
        source,
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e == "pcap" || e == "pcapng")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no .pcap or .pcapng file",
            dir.display()
        )));
    }
    Ok(files)
}

// ---- traffic --------------------------------------------------------------------------

/// One simulated flow.
#[derive(Clone, Debug)]
struct SimFlow {
    id: u64,
    class: Class,
    proto: u8,
    server_port: u16,
    template: u32,
    pps: f64,
    start_s: f64,
    end_s: f64,
    /// Node and shard of its last packet; `None` before its first.
    node: Option<u16>,
    shard: u16,
    /// Node its state was handed to; the NIC flips it at its next flowlet.
    hand_off_to: Option<u16>,
}

impl SimFlow {
    /// The client's address and port: distinct for every flow id below 2^24 × 60,000.
    fn client(&self) -> ([u8; 4], u16) {
        let id = (self.id as u32).to_be_bytes();
        (
            [10, id[1], id[2], id[3]],
            1024 + ((self.id >> 24) % 60_000) as u16,
        )
    }

    /// The server's address: one per template.
    fn server(&self) -> [u8; 4] {
        [198, 18, (self.template >> 8) as u8, self.template as u8]
    }

    /// The flow's frame: a minimal Ethernet/IPv4/TCP-or-UDP packet from its client.
    fn frame(&self, flags: u8, buf: &mut [u8; FRAME_LEN]) {
        let (src, sport) = self.client();
        write_ipv4_frame(
            src,
            self.server(),
            sport,
            self.server_port,
            self.proto,
            flags,
            buf,
        );
    }

    fn tuple(&self) -> nic_firmware::FlowTuple {
        let (client, sport) = self.client();
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src[..4].copy_from_slice(&client);
        dst[..4].copy_from_slice(&self.server());
        nic_firmware::FlowTuple {
            src,
            dst,
            sport,
            dport: self.server_port,
            proto: self.proto,
            ipv6: false,
            has_ports: true,
        }
    }
}

/// The flows every policy meets: arrivals drawn from a seeded generator that nothing
/// the policies do can influence.
struct Traffic {
    rng: StdRng,
    templates: Templates,
    mix: Vec<ClassMix>,
    /// Per class: offered load at the curve's peak, packets per second.
    peak_load: Vec<f64>,
    /// Per class: flows per second per unit of load curve.
    arrivals_per_unit: Vec<f64>,
    /// Rate scale from a template's rate to a simulated flow's.
    scale: f64,
    max_pps: f64,
    lags: Vec<i64>,
    next_id: u64,
}

impl Traffic {
    fn new(s: &Scenario, templates: Templates) -> Traffic {
        let total_share: f64 = s.traffic.classes.iter().map(|c| c.share).sum();
        let capacity = s.nodes.capacity_pps * f64::from(s.nodes.count);
        let peak_load: Vec<f64> = s
            .traffic
            .classes
            .iter()
            .map(|c| s.load.peak_fraction * capacity * c.share / total_share)
            .collect();
        let mean_pps: Vec<f64> = s
            .traffic
            .classes
            .iter()
            .map(|c| templates.mean_pps(c.class).max(1e-9))
            .collect();
        // Little's law per class: concurrent flows = load / mean rate; one global rate
        // scale keeps the classes' real rate differences and gives `flows_at_peak`.
        let unscaled: f64 = peak_load.iter().zip(&mean_pps).map(|(l, r)| l / r).sum();
        let scale = unscaled / f64::from(s.traffic.flows_at_peak);
        let arrivals_per_unit = s
            .traffic
            .classes
            .iter()
            .enumerate()
            .map(|(k, c)| peak_load[k] / (scale * mean_pps[k]) / c.mean_lifetime_s)
            .collect();
        let lags = s
            .traffic
            .classes
            .iter()
            .map(|c| (c.shift_hours * 3600.0 / f64::from(s.interval_s)).round() as i64)
            .collect();
        Traffic {
            rng: StdRng::seed_from_u64(s.seed),
            templates,
            mix: s.traffic.classes.clone(),
            peak_load,
            arrivals_per_unit,
            scale,
            max_pps: s.traffic.max_flow_share * s.nodes.capacity_pps,
            lags,
            next_id: 1,
        }
    }

    /// Flows arriving during tick `t` (window-relative), `factor` per class from events.
    fn arrivals(
        &mut self,
        curve: &Curve,
        t: i64,
        start_s: f64,
        dt: f64,
        factor: &[f64],
    ) -> Vec<SimFlow> {
        let mut out = Vec::new();
        for (k, mix) in self.mix.iter().enumerate() {
            let rate = self.arrivals_per_unit[k] * curve.at(t, self.lags[k]) * factor[k];
            let mean = rate * dt;
            let n = if mean > 0.0 {
                Poisson::new(mean).map_or(0, |p| p.sample(&mut self.rng) as usize)
            } else {
                0
            };
            let list = &self.templates.by_class[mix.class as usize];
            let sigma = LIFETIME_SIGMA;
            let mu = mix.mean_lifetime_s.ln() - sigma * sigma / 2.0;
            let life = LogNormal::new(mu, sigma).ok();
            for _ in 0..n {
                let ti = self.rng.random_range(0..list.len());
                let tpl = list[ti];
                let begin = start_s + self.rng.random::<f64>() * dt;
                let lifetime = life
                    .map_or(mix.mean_lifetime_s, |l| l.sample(&mut self.rng))
                    .clamp(1.0, MAX_LIFETIME_S);
                out.push(SimFlow {
                    id: self.next_id,
                    class: mix.class,
                    proto: tpl.proto,
                    server_port: tpl.server_port,
                    template: ti as u32,
                    pps: (tpl.pps * self.scale).min(self.max_pps),
                    start_s: begin,
                    end_s: begin + lifetime,
                    node: None,
                    shard: 0,
                    hand_off_to: None,
                });
                self.next_id += 1;
            }
        }
        out
    }

    /// Offered load of class `k` at tick `t` (for the forecaster's starting history):
    /// arrivals × mean lifetime × mean rate, which Little's law makes the class's
    /// peak load times the curve.
    fn expected_load(&self, curve: &Curve, k: usize, t: i64) -> f64 {
        self.peak_load[k] * curve.at(t, self.lags[k])
    }
}

// ---- nodes ----------------------------------------------------------------------------

/// A simulated load-balancer node's queue.
#[derive(Clone, Debug)]
struct SimNode {
    backlog: f64,
    failed: bool,
    /// Share of its capacity it serves (below 1 while degraded).
    speed: f64,
    /// Window hours its degradation lasts until.
    degraded_until: f64,
    /// What it reports to the agent at the end of a tick.
    delay_ms: f64,
    drop_rate: f64,
}

/// Packet-weighted queueing delays on a log scale.
#[derive(Clone, Debug)]
struct DelayHistogram {
    weight: Vec<f64>,
}

impl DelayHistogram {
    fn new() -> DelayHistogram {
        DelayHistogram {
            weight: vec![0.0; HIST_BUCKETS + 1],
        }
    }

    fn add(&mut self, delay_s: f64, w: f64) {
        let b = if delay_s <= 1e-6 {
            0
        } else {
            (((delay_s / 1e-6).log10() * HIST_PER_DECADE).floor() as usize + 1).min(HIST_BUCKETS)
        };
        self.weight[b] += w;
    }

    /// The delay below which a fraction `q` of packets waited, in ms (bucket upper edge).
    fn quantile_ms(&self, q: f64) -> f64 {
        let total: f64 = self.weight.iter().sum();
        if total <= 0.0 {
            return 0.0;
        }
        let mut acc = 0.0;
        for (b, w) in self.weight.iter().enumerate() {
            acc += w;
            if acc >= q * total {
                return if b == 0 {
                    0.0
                } else {
                    1e-3 * 10f64.powf(b as f64 / HIST_PER_DECADE)
                };
            }
        }
        1e-3 * 10f64.powf(HIST_BUCKETS as f64 / HIST_PER_DECADE)
    }
}

// ---- the run --------------------------------------------------------------------------

/// One policy's results.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PolicyReport {
    pub overload_seconds: f64,
    pub p50_delay_ms: f64,
    pub p99_delay_ms: f64,
    pub drops: u64,
    pub node_hours: f64,
    pub peak_nodes_on: usize,
    pub migrations: u64,
    pub flows_moved_with_handoff: u64,
    /// Flow states exported from a draining node and imported on another.
    pub handoffs_started: u64,
    pub handoff_state_bytes: u64,
    pub broken_flows: u64,
    pub flows_remapped_on_failure: u64,
    pub flowlet_moves: u64,
    pub flows: u64,
    pub packets_offered: u64,
    pub nic_packets: u64,
    pub forecast_mase: BTreeMap<String, f64>,
}

/// One tick of one policy, for the plot.
#[derive(Clone, Copy, Debug, Default)]
pub struct TickTrace {
    pub load: f64,
    pub capacity: f64,
    pub forecast: f64,
    pub moves: usize,
}

#[derive(Debug)]
pub struct PolicyRun {
    pub policy: Policy,
    pub report: PolicyReport,
    pub trace: Vec<TickTrace>,
}

/// What a simulation describes of itself.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioSummary {
    pub seed: u64,
    pub days: f64,
    pub interval_s: u32,
    pub nodes: u16,
    pub capacity_pps: f64,
    pub load_curve: String,
    pub flows_from: String,
}

/// The forecaster of the predictive policy: a model per series chosen once by
/// backtest, refitted every `refit` ticks on the bounded history.
struct Forecasts {
    periods: Vec<usize>,
    level: f64,
    refit: usize,
    horizon: usize,
    /// Series 0 is the total, then one per class of the mix.
    history: Vec<forecast::History>,
    models: Vec<Model>,
    /// Upper and point forecasts from the last refit, and the tick it was made after.
    upper: Vec<Vec<f64>>,
    point: Vec<Vec<f64>>,
    made_at: i64,
    /// (forecast error, seasonal naive error) per series over the window, for MASE.
    pairs: Vec<Vec<(f64, f64)>>,
}

impl Forecasts {
    fn new(s: &Scenario, traffic: &Traffic, curve: &Curve, warmup: u64) -> Forecasts {
        let per_day = (86_400 / s.interval_s) as usize;
        let history_len = (s.load.history_days * per_day as f64).round() as usize;
        let series = traffic.mix.len() + 1;
        let mut history: Vec<forecast::History> = (0..series)
            .map(|_| forecast::History::new(history_len.max(1)))
            .collect();
        let (warm, _) = s.ticks();
        for i in (1..=history_len as i64).rev() {
            let t = -(warm as i64) - i;
            let mut total = 0.0;
            for k in 0..traffic.mix.len() {
                let l = traffic.expected_load(curve, k, t);
                history[k + 1].push(l);
                total += l;
            }
            history[0].push(total);
        }
        let periods = forecast::usable_periods(&[per_day, 7 * per_day], history_len);
        let horizon = s.forecast.refit_ticks + warmup as usize + s.planner.scale_down_window + 2;
        let models = history
            .iter()
            .map(|h| {
                forecast::select(&h.to_vec(), Some(&periods), horizon, s.forecast.level)
                    .map_or(Model::SeasonalNaive, |sel| sel.forecast.model)
            })
            .collect();
        Forecasts {
            periods,
            level: s.forecast.level,
            refit: s.forecast.refit_ticks,
            horizon,
            history,
            models,
            upper: vec![Vec::new(); series],
            point: vec![Vec::new(); series],
            made_at: i64::MIN,
            pairs: vec![Vec::new(); series],
        }
    }

    /// Record tick `t`'s measured loads and refit when due.
    fn observe(&mut self, t: i64, measured: &[f64], in_window: bool) {
        let m = self.periods.first().copied().unwrap_or(1);
        for (i, v) in measured.iter().enumerate() {
            let h = &self.history[i];
            if in_window
                && h.len() >= m
                && let Some(p) = self.forecast_for(i, t)
            {
                // The seasonal naive forecast of the same tick: a period ago.
                let naive = h.get(h.len() - m).unwrap_or(*v);
                self.pairs[i].push((*v - p, *v - naive));
            }
            self.history[i].push(*v);
        }
        if self.made_at == i64::MIN || t - self.made_at >= self.refit as i64 {
            for i in 0..self.history.len() {
                let y = self.history[i].to_vec();
                let f =
                    forecast::forecast(self.models[i], &y, &self.periods, self.horizon, self.level)
                        .or_else(|_| {
                            forecast::forecast(
                                Model::SeasonalNaive,
                                &y,
                                &self.periods,
                                self.horizon,
                                self.level,
                            )
                        });
                if let Ok(f) = f {
                    self.upper[i] = f.upper;
                    self.point[i] = f.point;
                }
            }
            self.made_at = t;
        }
    }

    /// The point forecast of series `i` for tick `t`, from the last refit.
    fn forecast_for(&self, i: usize, t: i64) -> Option<f64> {
        let off = t - self.made_at - 1;
        if self.made_at == i64::MIN || off < 0 {
            return None;
        }
        self.point[i].get(off as usize).copied()
    }

    /// Upper bounds of series `i` from the tick after `t` on.
    fn upper_after(&self, i: usize, t: i64) -> &[f64] {
        let off = (t - self.made_at).max(0) as usize;
        self.upper[i].get(off..).unwrap_or(&[])
    }

    /// MASE per series over the window: the forecasts' mean absolute error scaled by
    /// that of the seasonal naive forecast (a day earlier) on the same ticks, so below
    /// 1 beats repeating yesterday. NaN for a series with no error to scale by.
    fn mase(&self) -> Vec<f64> {
        self.pairs
            .iter()
            .map(|p| {
                let e: f64 = p.iter().map(|(e, _)| e.abs()).sum();
                let naive: f64 = p.iter().map(|(_, n)| n.abs()).sum();
                if naive > 0.0 { e / naive } else { f64::NAN }
            })
            .collect()
    }
}

/// Build and boot the emulated NIC for a scenario: nodes `0..on` active (and weighted),
/// the rest down; timeouts long enough that a flow's packet per tick keeps it alive.
fn boot_nic(s: &Scenario, on: usize) -> Result<(Arc<Mutex<NicDevice>>, Nic<InProcess>), Error> {
    let idle_ms = (s.interval_s * 2_000 + 60_000).min(nic_firmware::config::MAX_TIMEOUT_MS);
    let config = PipelineConfig {
        shards: s.shards,
        flow_capacity: s.nic_flow_capacity,
        timeouts: Timeouts {
            tcp_ms: idle_ms,
            tcp_close_ms: idle_ms,
            udp_ms: idle_ms,
            other_ms: idle_ms,
            icmp_ms: idle_ms,
        },
        nodes: (0..s.nodes.count)
            .map(|id| NodeConfig {
                id,
                weight: u32::from(usize::from(id) < on),
                state: if usize::from(id) < on {
                    NodeState::Active
                } else {
                    NodeState::Down
                },
            })
            .collect(),
        ..PipelineConfig::default()
    };
    let img = crate::nic_cmd::signed_image(&config, "scenario")?;
    let mut dev = NicDevice::new(DeviceOptions::default());
    dev.preload(img)
        .map_err(|e| Error::Usage(format!("scenario image: {e}")))?;
    let model = Arc::new(Mutex::new(dev));
    let mut nic = Nic::open(InProcess::new(model.clone()))?;
    nic.setup_commands(12)?;
    Ok((model, nic))
}

/// Apply a decision to the NIC in one command batch (all of it, or nothing).
fn apply(nic: &mut Nic<InProcess>, a: &Actions) -> Result<(), Error> {
    let mut batch = Vec::new();
    for (id, p) in &a.power {
        let code = hw_sim::image::node_state_code(crate::agent::nic_state(*p));
        batch.push(CmdDesc::new(
            Opcode::SetNodeState,
            (*id).into(),
            code.into(),
        ));
    }
    for m in &a.moves {
        batch.push(CmdDesc::new(
            Opcode::SetShardNode,
            m.shard.into(),
            m.to.into(),
        ));
    }
    for (c, g) in &a.groups {
        batch.push(CmdDesc::new(Opcode::SetClassGroup, *c as u32, (*g).into()));
    }
    let statuses = nic.submit(&batch)?;
    if let Some((i, st)) = statuses.iter().enumerate().find(|(_, s)| **s != Status::Ok) {
        return Err(Error::Agent(format!(
            "the NIC refused descriptor {i} of a plan ({st:?})"
        )));
    }
    Ok(())
}

/// Hand the long-lived flows of draining nodes to the node their shard is on now: the
/// old node exports each flow's state, the new one imports it (`duration_ms`), then
/// the NIC flips the flow at its next flowlet boundary. Flows younger than
/// `min_age_s` are left to end where they are: most short flows end before a handoff
/// would pay off. Returns the handoffs the NIC accepted.
fn hand_off(
    nic: &mut Nic<InProcess>,
    flows: &mut [SimFlow],
    from: &[u16],
    shard_node: &[u16],
    now_s: f64,
    m: &MigrationSpec,
) -> Result<u64, Error> {
    let mut picked = Vec::new();
    for (i, f) in flows.iter().enumerate() {
        if picked.len() == m.max_per_tick {
            break;
        }
        let (Some(node), None) = (f.node, f.hand_off_to) else {
            continue;
        };
        let Some(&to) = shard_node.get(usize::from(f.shard)) else {
            continue;
        };
        if from.contains(&node) && to != node && now_s - f.start_s >= m.min_age_s {
            picked.push((i, to));
        }
    }
    if picked.is_empty() {
        return Ok(0);
    }
    let list: Vec<(nic_firmware::FlowTuple, u16)> = picked
        .iter()
        .map(|(i, to)| (flows[*i].tuple(), *to))
        .collect();
    let results = nic.hand_off_flows(&list)?;
    let mut accepted = 0;
    for ((i, to), r) in picked.iter().zip(results) {
        if r == hdl_bindings::ring::FlowResult::Applied {
            flows[*i].hand_off_to = Some(*to);
            accepted += 1;
        }
    }
    Ok(accepted)
}

/// One packet of a tick: time (ns), index of its flow, TCP flags, and how many packets
/// share the flow's load this tick.
type TickPacket = (u64, usize, u8, u8);

/// The tick's packets in time order. One packet per live flow: SYN when it starts, RST
/// when it ends, else an ACK. A classified flow of a sharded class (a group of more
/// than one) sends one per member of its group instead, evenly spread over its part of
/// the tick, each carrying an equal share of its load: a real flow has many flowlets in
/// a tick, which the NIC deals out to the members in turn, so its load splits over them
/// rather than hopping whole from one member to the next tick by tick.
fn schedule_packets(
    flows: &[SimFlow],
    groups: &[u8],
    start_s: f64,
    dt: f64,
    order: &mut Vec<TickPacket>,
) {
    order.clear();
    for (i, f) in flows.iter().enumerate() {
        if f.node.is_none() {
            order.push(((f.start_s * 1e9) as u64, i, 0x02, 1));
            continue;
        }
        let parts = groups.get(f.class as usize).copied().unwrap_or(1).max(1);
        let k = f64::from(parts);
        for j in 0..parts {
            let last = j + 1 == parts;
            let j = f64::from(j);
            let (at, flags) = if f.end_s < start_s + dt {
                let at = start_s + (f.end_s - start_s) * (j + 1.0) / k;
                (at, if last { 0x14 } else { 0x10 })
            } else {
                // A fixed offset per flow, so its packets are a tick apart.
                let offset = (f.id.wrapping_mul(0x9E37_79B9) % 1000) as f64 / 1000.0;
                (start_s + (offset + j / k).fract() * dt, 0x10)
            };
            order.push(((at * 1e9) as u64, i, flags, parts));
        }
    }
    order.sort_unstable();
}

/// Run one policy over the scenario.
fn run_policy(
    s: &Scenario,
    policy: Policy,
    curve: &Curve,
    templates: &Templates,
    progress: &indicatif::ProgressBar,
) -> Result<PolicyRun, Error> {
    let (warm, run) = s.ticks();
    let dt = f64::from(s.interval_s);
    let count = usize::from(s.nodes.count);
    let cap = s.nodes.capacity_pps;
    let mut traffic = Traffic::new(s, templates.clone());
    let first_load: f64 = (0..traffic.mix.len())
        .map(|k| traffic.expected_load(curve, k, -(warm as i64)))
        .sum();
    let on = match policy {
        Policy::Static => count,
        _ => ((first_load / (s.planner.target_utilisation * cap)).ceil() as usize)
            .clamp(s.planner.min_active, s.planner.max_active.min(count)),
    };
    let (model, mut nic) = boot_nic(s, on)?;
    let tables = nic.read_tables()?;
    let power: Vec<Power> = (0..count)
        .map(|i| if i < on { Power::Active } else { Power::Off })
        .collect();
    let warmup_ticks = s.warmup_ticks();
    let mut planner = Planner::new(
        policy,
        PlannerConfig {
            max_active: s.planner.max_active.min(count),
            ..s.planner.clone()
        },
        warmup_ticks,
        power,
        tables.shard_node.clone(),
    );
    let mut forecasts =
        (policy == Policy::Predictive).then(|| Forecasts::new(s, &traffic, curve, warmup_ticks));
    let mut nodes = vec![
        SimNode {
            backlog: 0.0,
            failed: false,
            speed: 1.0,
            degraded_until: 0.0,
            delay_ms: 0.0,
            drop_rate: 0.0,
        };
        count
    ];
    let mut flows: Vec<SimFlow> = Vec::new();
    let mut report = PolicyReport::default();
    let mut hist = DelayHistogram::new();
    let mut trace = Vec::with_capacity(run);
    let mut flash: Vec<(usize, f64, f64, f64)> = Vec::new();
    let mut frames: Vec<[u8; FRAME_LEN]> = Vec::new();
    let mut order: Vec<TickPacket> = Vec::new();
    let mut decisions: Vec<Decision> = Vec::new();
    let mut node_load = vec![0.0; count];
    let mut node_flows = vec![0u64; count];
    let mut shard_load = vec![0.0; usize::from(s.shards)];
    let mut class_load = vec![0.0; Class::COUNT];
    let total_ticks = warm + run;
    for tick in 0..total_ticks {
        let t = tick as i64 - warm as i64;
        let in_window = t >= 0;
        let start_s = tick as f64 * dt;
        let hours = t as f64 * dt / 3600.0;
        // Events due in this tick.
        for e in &s.events {
            let at = e.at_hours();
            if at >= hours && at < hours + dt / 3600.0 {
                match e {
                    Event::Fail { node, .. } => nodes[usize::from(*node)].failed = true,
                    Event::Recover { node, .. } => nodes[usize::from(*node)].failed = false,
                    Event::Degrade {
                        node,
                        factor,
                        hours: h,
                        ..
                    } => {
                        let n = &mut nodes[usize::from(*node)];
                        n.speed = *factor;
                        n.degraded_until = at + h;
                    }
                    Event::FlashCrowd {
                        class,
                        factor,
                        hours: h,
                        ..
                    } => {
                        if let Some(k) = traffic.mix.iter().position(|m| m.class == *class) {
                            flash.push((k, at, at + h, *factor));
                        }
                    }
                }
            }
        }
        let factor: Vec<f64> = (0..traffic.mix.len())
            .map(|k| {
                flash
                    .iter()
                    .filter(|f| f.0 == k && hours >= f.1 && hours < f.2)
                    .map(|f| f.3)
                    .product()
            })
            .collect();
        let arrivals = traffic.arrivals(curve, t, start_s, dt, &factor);
        if in_window {
            report.flows += arrivals.len() as u64;
        }
        flows.extend(arrivals);
        schedule_packets(&flows, planner.groups(), start_s, dt, &mut order);
        frames.clear();
        frames.resize(order.len(), [0u8; FRAME_LEN]);
        for (k, (_, i, flags, _)) in order.iter().enumerate() {
            flows[*i].frame(*flags, &mut frames[k]);
        }
        decisions.clear();
        {
            let pkts: Vec<Packet<'_>> = order
                .iter()
                .zip(&frames)
                .map(|((ts, _, _, _), d)| Packet {
                    ts_ns: *ts,
                    data: d,
                    wire_len: WIRE_LEN,
                })
                .collect();
            let mut dev = model.lock().unwrap_or_else(|e| e.into_inner());
            for burst in pkts.chunks(nic_firmware::pipeline::BURST) {
                dev.receive(LinkType::Ethernet, burst, &mut decisions);
            }
        }
        // The checker, and each flow's load on the node that now carries it.
        node_load.iter_mut().for_each(|v| *v = 0.0);
        node_flows.iter_mut().for_each(|v| *v = 0);
        shard_load.iter_mut().for_each(|v| *v = 0.0);
        class_load.iter_mut().for_each(|v| *v = 0.0);
        let mut dropped = 0.0;
        let mut offered = 0.0;
        let groups = planner.groups();
        for ((_, i, _, parts), d) in order.iter().zip(&decisions) {
            let f = &mut flows[*i];
            let overlap = (f.end_s.min(start_s + dt) - f.start_s.max(start_s)).max(0.0);
            let pkts = f.pps * overlap / f64::from(*parts);
            offered += pkts;
            class_load[f.class as usize] += pkts / dt;
            if d.verdict != Verdict::Forward {
                dropped += pkts;
                continue;
            }
            if let Some(old) = f.node
                && old != d.node
                && in_window
            {
                if f.hand_off_to == Some(d.node) {
                    report.flows_moved_with_handoff += 1;
                } else if planner.power().get(usize::from(old)) == Some(&Power::Failed)
                    || nodes[usize::from(old)].failed
                {
                    report.flows_remapped_on_failure += 1;
                } else if d.shard != f.shard && groups[f.class as usize] > 1 {
                    report.flowlet_moves += 1;
                } else {
                    report.broken_flows += 1;
                }
            }
            if f.hand_off_to == Some(d.node) {
                f.hand_off_to = None;
            }
            f.node = Some(d.node);
            f.shard = d.shard;
            let n = usize::from(d.node);
            if n < count {
                node_load[n] += pkts / dt;
                node_flows[n] += 1;
            }
            if let Some(sl) = shard_load.get_mut(usize::from(d.shard)) {
                *sl += pkts / dt;
            }
        }
        // The profiler's verdicts for the flows that started: pushed down to the NIC
        // so class groups (flowlet sharding) apply to them.
        let fresh: Vec<(nic_firmware::FlowTuple, Class)> = flows
            .iter()
            .filter(|f| f.start_s >= start_s && f.node.is_some() && f.end_s >= start_s + dt)
            .map(|f| (f.tuple(), f.class))
            .collect();
        if !fresh.is_empty() {
            nic.push_flow_classes(&fresh)?;
        }
        flows.retain(|f| f.end_s >= start_s + dt);
        // Nodes serve, queue and drop.
        let mut capacity_on = 0.0;
        for (n, node) in nodes.iter_mut().enumerate() {
            let p = planner.power()[n];
            if node.speed < 1.0 && hours >= node.degraded_until {
                node.speed = 1.0;
            }
            let mu = if node.failed || !matches!(p, Power::Active | Power::Draining) {
                0.0
            } else {
                cap * node.speed
            };
            node.delay_ms = 0.0;
            node.drop_rate = 0.0;
            capacity_on += mu;
            let lambda = node_load[n];
            if in_window {
                if p.is_on() {
                    report.node_hours += dt / 3600.0;
                }
                if lambda > mu && lambda > 0.0 {
                    report.overload_seconds += dt;
                }
            }
            let arriving = lambda * dt;
            if mu <= 0.0 {
                dropped += arriving;
                node.backlog = 0.0;
                continue;
            }
            let b0 = node.backlog;
            let served = (b0 + arriving).min(mu * dt);
            let mut b1 = b0 + arriving - served;
            let buffer = cap * s.nodes.queue_s;
            if b1 > buffer {
                dropped += b1 - buffer;
                if arriving > 0.0 {
                    node.drop_rate = ((b1 - buffer) / arriving).min(1.0);
                }
                b1 = buffer;
            }
            node.backlog = b1;
            // What the node's own counters say at the end of the tick: the wait its
            // backlog imposes plus M/M/1's mean wait at this utilisation.
            let mm1_wait = if lambda < mu {
                lambda / mu / (mu - lambda)
            } else {
                0.0
            };
            node.delay_ms = (b1 / mu + mm1_wait) * 1e3;
            if in_window && arriving > 0.0 {
                let rho = (lambda / mu).min(0.99);
                // The backlog over the tick is a line from b0 at rate λ − μ, held
                // between empty and the buffer; packets arriving at each time point
                // wait for the backlog ahead of them, plus M/M/1 waiting at ρ.
                let times = if b0 > 0.0 || lambda > mu {
                    DELAY_TIMES
                } else {
                    1
                };
                let w = arriving / (times * DELAY_POINTS) as f64;
                for j in 0..times {
                    let at = (j as f64 + 0.5) / times as f64 * dt;
                    let backlog = (b0 + (lambda - mu) * at).clamp(0.0, buffer);
                    for k in 0..DELAY_POINTS {
                        let q = (k as f64 + 0.5) / DELAY_POINTS as f64;
                        // M/M/1 waiting time: zero with probability 1 − ρ, else exponential.
                        let wait = if q <= 1.0 - rho {
                            0.0
                        } else {
                            (rho / (1.0 - q)).ln() / (mu - rho * mu)
                        };
                        hist.add(backlog / mu + wait, w);
                    }
                }
            }
        }
        if in_window {
            report.drops += dropped.round() as u64;
            report.packets_offered += offered.round() as u64;
            report.nic_packets += decisions.len() as u64;
            let on_now = planner.power().iter().filter(|p| p.is_on()).count();
            report.peak_nodes_on = report.peak_nodes_on.max(on_now);
        }
        // The agent: measure, forecast, plan, apply.
        let inputs: Vec<NodeInput> = (0..count)
            .map(|n| NodeInput {
                load: node_load[n],
                capacity: cap,
                flows: node_flows[n],
                silent: nodes[n].failed,
                delay_ms: nodes[n].delay_ms,
                drop_rate: nodes[n].drop_rate,
            })
            .collect();
        let measured_total: f64 = node_load.iter().sum();
        let mut forecast_now = 0.0;
        let empty: Vec<Vec<f64>> = Vec::new();
        let mut class_upper = vec![Vec::new(); Class::COUNT];
        let total_upper: Vec<f64> = match forecasts.as_mut() {
            Some(fc) => {
                let mut measured = vec![class_load.iter().sum::<f64>()];
                measured.extend(traffic.mix.iter().map(|m| class_load[m.class as usize]));
                fc.observe(t, &measured, in_window);
                for (k, m) in traffic.mix.iter().enumerate() {
                    class_upper[m.class as usize] = fc.upper_after(k + 1, t).to_vec();
                }
                forecast_now = fc.forecast_for(0, t + 1).unwrap_or(0.0);
                fc.upper_after(0, t).to_vec()
            }
            None => Vec::new(),
        };
        let actions = planner.decide(&Inputs {
            tick: tick as u64,
            nodes: &inputs,
            shard_load: &shard_load,
            class_load: &class_load,
            total_upper: &total_upper,
            class_upper: if forecasts.is_some() {
                &class_upper
            } else {
                &empty
            },
        });
        if !s.planner.observe_only && !actions.is_empty() {
            apply(&mut nic, &actions)?;
        }
        if s.migration.hand_off && !s.planner.observe_only && !actions.hand_off_from.is_empty() {
            let handed = hand_off(
                &mut nic,
                &mut flows,
                &actions.hand_off_from,
                planner.shard_node(),
                start_s + dt,
                &s.migration,
            )?;
            if in_window {
                report.handoffs_started += handed;
                report.handoff_state_bytes += handed * s.migration.state_bytes;
            }
        }
        if in_window {
            report.migrations += actions.moves.len() as u64;
            trace.push(TickTrace {
                load: measured_total,
                capacity: capacity_on,
                forecast: forecast_now,
                moves: actions.moves.len(),
            });
        }
        progress.inc(1);
    }
    if let Some(fc) = &forecasts {
        let mase = fc.mase();
        report.forecast_mase.insert("total".into(), round3(mase[0]));
        for (k, m) in traffic.mix.iter().enumerate() {
            report
                .forecast_mase
                .insert(m.class.as_str().into(), round3(mase[k + 1]));
        }
    }
    report.p50_delay_ms = round3(hist.quantile_ms(0.5));
    report.p99_delay_ms = round3(hist.quantile_ms(0.99));
    report.node_hours = round3(report.node_hours);
    Ok(PolicyRun {
        policy,
        report,
        trace,
    })
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A whole simulation: every requested policy over the same traffic.
#[derive(Debug)]
pub struct Simulation {
    pub scenario: ScenarioSummary,
    pub runs: Vec<PolicyRun>,
}

/// Run `policies` over the scenario, in parallel (each has its own NIC and traffic).
pub fn simulate(
    s: &Scenario,
    policies: &[Policy],
    load_csv: Option<(&Path, Option<&str>)>,
    show_progress: bool,
) -> Result<Simulation, Error> {
    let (csv, column) = match load_csv {
        Some((p, c)) => (p.to_path_buf(), c.map(str::to_owned)),
        None => (resolve(&s.load.csv), s.load.column.clone()),
    };
    let curve = Curve::load(s, &csv, column.as_deref())?;
    let templates = Templates::load(s)?;
    let (warm, run) = s.ticks();
    let progress = if show_progress {
        let pb = indicatif::ProgressBar::new(((warm + run) * policies.len()) as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} ticks ({eta} left)")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let results: Vec<Result<PolicyRun, Error>> = std::thread::scope(|scope| {
        let handles: Vec<_> = policies
            .iter()
            .map(|p| {
                let (curve, templates, progress) = (&curve, &templates, &progress);
                scope.spawn(move || run_policy(s, *p, curve, templates, progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Agent("a policy's run panicked".into())))
            })
            .collect()
    });
    progress.finish_and_clear();
    let runs = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(Simulation {
        scenario: ScenarioSummary {
            seed: s.seed,
            days: s.duration_hours / 24.0,
            interval_s: s.interval_s,
            nodes: s.nodes.count,
            capacity_pps: s.nodes.capacity_pps,
            load_curve: curve.name,
            flows_from: templates.source,
        },
        runs,
    })
}

// ---- output ---------------------------------------------------------------------------

impl Simulation {
    pub fn to_json(&self) -> serde_json::Value {
        let policies: serde_json::Map<String, serde_json::Value> = self
            .runs
            .iter()
            .map(|r| {
                (
                    r.policy.as_str().to_string(),
                    serde_json::to_value(&r.report).unwrap_or_default(),
                )
            })
            .collect();
        serde_json::json!({ "scenario": self.scenario, "policies": policies })
    }

    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let s = &self.scenario;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "scenario: {:.1} days at {} s ticks, seed {}, {} nodes of {:.0} pps\nload curve: {}\nflows: {}\n",
            s.days, s.interval_s, s.seed, s.nodes, s.capacity_pps, s.load_curve, s.flows_from
        );
        let _ = write!(out, "{:<28}", "");
        for r in &self.runs {
            let _ = write!(out, " {:>14}", r.policy.as_str());
        }
        out.push('\n');
        type Cell = fn(&PolicyReport) -> String;
        let rows: [(&str, Cell); 15] = [
            ("overload-seconds", |r| format!("{:.0}", r.overload_seconds)),
            ("p50 queueing delay (ms)", |r| {
                format!("{:.3}", r.p50_delay_ms)
            }),
            ("p99 queueing delay (ms)", |r| {
                format!("{:.3}", r.p99_delay_ms)
            }),
            ("drops (packets)", |r| r.drops.to_string()),
            ("node-hours", |r| format!("{:.1}", r.node_hours)),
            ("peak nodes on", |r| r.peak_nodes_on.to_string()),
            ("migrations (shard moves)", |r| r.migrations.to_string()),
            ("flows moved with handoff", |r| {
                r.flows_moved_with_handoff.to_string()
            }),
            ("handoffs started", |r| r.handoffs_started.to_string()),
            ("handoff state (bytes)", |r| {
                r.handoff_state_bytes.to_string()
            }),
            ("broken flows", |r| r.broken_flows.to_string()),
            ("flows remapped (failure)", |r| {
                r.flows_remapped_on_failure.to_string()
            }),
            ("flowlet moves", |r| r.flowlet_moves.to_string()),
            ("flows", |r| r.flows.to_string()),
            ("packets offered", |r| r.packets_offered.to_string()),
        ];
        for (name, cell) in rows {
            let _ = write!(out, "{name:<28}");
            for r in &self.runs {
                let _ = write!(out, " {:>14}", cell(&r.report));
            }
            out.push('\n');
        }
        for r in &self.runs {
            if !r.report.forecast_mase.is_empty() {
                let list: Vec<String> = r
                    .report
                    .forecast_mase
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.3}"))
                    .collect();
                let _ = writeln!(
                    out,
                    "\nforecast MASE ({}): {}",
                    r.policy.as_str(),
                    list.join(", ")
                );
            }
        }
        out
    }
}

// ---- command --------------------------------------------------------------------------

/// What `flowshard simulate` was asked.
#[derive(Debug)]
pub struct Options {
    pub scenario: Option<PathBuf>,
    pub policies: Vec<Policy>,
    pub load_csv: Option<PathBuf>,
    pub load_column: Option<String>,
    pub load_sample_s: Option<u32>,
    pub json: bool,
    pub plot: Option<PathBuf>,
}

pub fn run(opts: &Options) -> Result<(), Error> {
    let mut scenario = match &opts.scenario {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| Error::Io {
                what: format!("scenario {}", p.display()),
                source,
            })?;
            Scenario::parse(&text, &p.display().to_string())?
        }
        None => Scenario::parse(DEFAULT_SCENARIO, "(embedded default)")?,
    };
    if let Some(s) = opts.load_sample_s {
        if s == 0 {
            return Err(Error::Usage("--load-sample-s must be at least 1".into()));
        }
        scenario.load.sample_s = s;
    }
    // A plot that cannot be drawn is refused before the run, not after it.
    if let Some(p) = &opts.plot {
        plot_format(p)?;
    }
    let load = opts
        .load_csv
        .as_deref()
        .map(|p| (p, opts.load_column.as_deref()));
    let show = !opts.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let sim = simulate(&scenario, &opts.policies, load, show)?;
    if let Some(p) = &opts.plot {
        plot(&sim, p)?;
    }
    if opts.json {
        println!("{}", sim.to_json());
    } else {
        print!("{}", sim.to_text());
    }
    Ok(())
}

/// Where a plot's labels get their glyphs (plotters lays text out with this font for
/// SVG too, and rasters it for PNG); the set-up installs it (Debian's
/// fonts-dejavu-core). `FLOWSHARD_PLOT_FONT` names another TrueType or OpenType file.
const PLOT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The formats `--plot` draws, by the file's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlotFormat {
    Svg,
    Png,
}

/// The format a plot file's extension names, with the font drawing needs loaded.
pub fn plot_format(path: &Path) -> Result<PlotFormat, Error> {
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("svg") => PlotFormat::Svg,
        Some(e) if e.eq_ignore_ascii_case("png") => PlotFormat::Png,
        _ => {
            return Err(Error::Usage(format!(
                "--plot {}: name an .svg or .png file",
                path.display()
            )));
        }
    };
    register_plot_font()?;
    Ok(format)
}

/// One panel per policy: offered load, serving capacity, the forecast (predictive) and
/// shard moves over the window, as SVG or PNG by the file's extension.
pub fn plot(sim: &Simulation, path: &Path) -> Result<(), Error> {
    use plotters::prelude::*;
    let err = |e: String| Error::Io {
        what: format!("plot {}", path.display()),
        source: std::io::Error::other(e),
    };
    let size = (1200, 320 * sim.runs.len().max(1) as u32);
    match plot_format(path)? {
        PlotFormat::Svg => draw(sim, SVGBackend::new(path, size).into_drawing_area()).map_err(err),
        PlotFormat::Png => {
            draw(sim, BitMapBackend::new(path, size).into_drawing_area()).map_err(err)
        }
    }
}

/// Load the plot font once per process.
fn register_plot_font() -> Result<(), Error> {
    static FONT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    FONT.get_or_init(|| {
        let path = std::env::var_os("FLOWSHARD_PLOT_FONT")
            .map_or_else(|| PathBuf::from(PLOT_FONT), PathBuf::from);
        let bytes = std::fs::read(&path).map_err(|e| {
            format!(
                "a plot needs a font for its labels: {}: {e} (`make setup` installs \
                 fonts-dejavu-core; FLOWSHARD_PLOT_FONT names another font file)",
                path.display()
            )
        })?;
        // The font lives as long as the process: plotters keeps a &'static to it.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a TrueType or OpenType font", path.display()))
    })
    .clone()
    .map_err(Error::Usage)
}

fn draw<DB: plotters::prelude::DrawingBackend>(
    sim: &Simulation,
    root: plotters::drawing::DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((sim.runs.len().max(1), 1));
    let hours = f64::from(sim.scenario.interval_s) / 3600.0;
    for (run, area) in sim.runs.iter().zip(panels) {
        let top = run
            .trace
            .iter()
            .map(|t| t.load.max(t.capacity).max(t.forecast))
            .fold(1.0, f64::max)
            / 1e6;
        let end = run.trace.len() as f64 * hours;
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!(
                    "{}: overload {:.0} s, node-hours {:.1}, {} shard moves, {} broken flows",
                    run.policy.as_str(),
                    run.report.overload_seconds,
                    run.report.node_hours,
                    run.report.migrations,
                    run.report.broken_flows
                ),
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..end, 0.0..top * 1.1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("hours")
            .y_desc("Mpps")
            .draw()
            .map_err(err)?;
        let series = |f: fn(&TickTrace) -> f64| -> Vec<(f64, f64)> {
            run.trace
                .iter()
                .enumerate()
                .map(|(i, t)| (i as f64 * hours, f(t) / 1e6))
                .collect()
        };
        chart
            .draw_series(LineSeries::new(series(|t| t.load), &BLUE))
            .map_err(err)?
            .label("offered load")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        chart
            .draw_series(LineSeries::new(series(|t| t.capacity), &BLACK))
            .map_err(err)?
            .label("capacity in service")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
        if run.trace.iter().any(|t| t.forecast > 0.0) {
            chart
                .draw_series(LineSeries::new(series(|t| t.forecast), &GREEN))
                .map_err(err)?
                .label("forecast")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], GREEN));
        }
        chart
            .draw_series(
                run.trace
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.moves > 0)
                    .map(|(i, _)| Circle::new((i as f64 * hours, top * 1.05), 2, RED.filled())),
            )
            .map_err(err)?
            .label("shard moves")
            .legend(|(x, y)| Circle::new((x + 8, y), 3, RED.filled()));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small hermetic scenario: synthetic flows, a generated daily load curve with
    /// evening peaks, 8 nodes, one day after three of history.
    fn small(dir: &Path) -> Scenario {
        let csv = dir.join("load.csv");
        let mut text = String::from("t,load\n");
        for h in 0..(24 * 6) {
            let hour = (h % 24) as f64;
            let v = 100.0 + 900.0 * (-(hour - 18.0).powi(2) / 8.0).exp();
            text.push_str(&format!("{h},{v}\n"));
        }
        std::fs::write(&csv, text).unwrap();
        let mut s = Scenario::parse(DEFAULT_SCENARIO, "default").unwrap();
        s.duration_hours = 24.0;
        s.warmup_hours = 1.0;
        s.nodes.count = 8;
        s.nodes.capacity_pps = 10_000.0;
        s.planner.max_active = 8;
        s.load = LoadSpec {
            csv,
            column: Some("load".into()),
            sample_s: 3600,
            start_day: 4.0,
            history_days: 3.0,
            peak_fraction: 0.8,
        };
        s.traffic.source = Source::Synthetic;
        s.traffic.flows_at_peak = 400;
        s.traffic.max_flow_share = 0.2;
        for c in &mut s.traffic.classes {
            c.shift_hours = 0.0;
        }
        s.events = vec![Event::Fail {
            at_hours: 10.0,
            node: 1,
        }];
        s
    }

    fn report(sim: &Simulation, p: Policy) -> &PolicyReport {
        &sim.runs.iter().find(|r| r.policy == p).unwrap().report
    }

    #[test]
    fn the_default_scenarios_parse() {
        let s = Scenario::parse(DEFAULT_SCENARIO, "default").unwrap();
        assert_eq!(s.ticks(), (18, 1008));
        let other = include_str!("../scenarios/vic-elec.toml");
        Scenario::parse(other, "vic-elec").unwrap();
    }

    #[test]
    fn bad_scenarios_name_the_key() {
        let cases = [
            ("seed = 7\nbogus = 1\n", "bogus"),
            ("interval_s = 0\n", "interval_s"),
            (
                "[planner]\ntarget_utilisation = 1.5\n",
                "target_utilisation",
            ),
            (
                "[[events]]\nat_hours = 1.0\nkind = \"fail\"\nnode = 99\n",
                "node 99",
            ),
            (
                "[[events]]\nat_hours = 1.0\nkind = \"explode\"\n",
                "explode",
            ),
        ];
        for (change, needle) in cases {
            let mut text = DEFAULT_SCENARIO.to_string();
            for line in change
                .lines()
                .filter(|l| l.contains(" = ") && !l.starts_with("at_hours"))
            {
                let key = line.split(" = ").next().unwrap();
                // Replace the key where it stands, or add it.
                if let Some(at) = text.find(&format!("\n{key} = ")) {
                    let end = text[at + 1..].find('\n').unwrap() + at + 1;
                    text.replace_range(at + 1..end, line);
                    continue;
                }
            }
            if change.starts_with("seed") {
                text = format!("bogus = 1\n{text}");
            } else if change.starts_with("[[events]]") {
                text.push_str(change);
            }
            let err = Scenario::parse(&text, "test").unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn a_degraded_node_is_found_by_its_queue_and_relieved() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = small(dir.path());
        s.events = vec![Event::Degrade {
            at_hours: 12.0,
            node: 0,
            factor: 0.3,
            hours: 10.0,
        }];
        let on = simulate(&s, &[Policy::Reactive, Policy::Predictive], None, false).unwrap();
        // The same run with marks nothing reaches: the node keeps its share.
        s.planner.degraded_delay_ms = 1e9;
        s.planner.degraded_drop_rate = 1.0;
        let off = simulate(&s, &[Policy::Reactive, Policy::Predictive], None, false).unwrap();
        for p in [Policy::Reactive, Policy::Predictive] {
            let (a, b) = (report(&on, p), report(&off, p));
            assert!(
                a.drops * 2 < b.drops && a.overload_seconds < b.overload_seconds,
                "{p:?}: with the trigger {a:?}, without {b:?}"
            );
            assert_eq!(a.broken_flows, 0, "{p:?}");
        }
    }

    #[test]
    fn plots_are_drawn_as_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let sim = simulate(&small(dir.path()), &[Policy::Reactive], None, false).unwrap();
        let svg = dir.path().join("p.svg");
        plot(&sim, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("reactive: overload"));
        let png = dir.path().join("p.PNG");
        plot(&sim, &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
        let err = plot_format(Path::new("p.jpg")).unwrap_err().to_string();
        assert!(
            err.contains("p.jpg") && err.contains(".svg or .png"),
            "{err}"
        );
    }

    #[test]
    fn a_run_repeats_exactly_and_breaks_no_flow() {
        let dir = tempfile::tempdir().unwrap();
        let s = small(dir.path());
        let a = simulate(&s, &Policy::ALL, None, false).unwrap();
        let b = simulate(&s, &Policy::ALL, None, false).unwrap();
        assert_eq!(a.to_json(), b.to_json(), "same seed, same results");
        for p in Policy::ALL {
            let r = report(&a, p);
            assert_eq!(r.broken_flows, 0, "{p:?}: {r:?}");
            assert!(r.flows > 1000 && r.nic_packets > r.flows, "{p:?}: {r:?}");
        }
        // Static keeps all 8 nodes on for 24 h, but node 1 from its failure on.
        let st = report(&a, Policy::Static);
        assert!((st.node_hours - (8.0 * 24.0 - 14.0)).abs() < 0.5, "{st:?}");
        assert_eq!(st.handoffs_started, 0);
        assert_eq!(st.migrations, 0);
        // The failed node's flows were remapped by the NIC on their next packet.
        assert!(st.flows_remapped_on_failure > 0, "{st:?}");
        // The others scale with the load curve, so they use fewer node-hours.
        for p in [Policy::Reactive, Policy::Predictive] {
            let r = report(&a, p);
            assert!(r.node_hours < st.node_hours, "{p:?}: {r:?}");
            assert!(r.migrations > 0, "{p:?}: {r:?}");
        }
        let mase = &report(&a, Policy::Predictive).forecast_mase;
        assert!(mase["total"].is_finite() && mase["total"] > 0.0, "{mase:?}");
    }

    #[test]
    fn the_checker_sees_flows_an_overfull_nic_table_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = small(dir.path());
        s.events.clear();
        // Far fewer entries than live flows: established flows are evicted, and come
        // back as new flows on whatever node their shard is on by then.
        s.nic_flow_capacity = 64;
        let sim = simulate(&s, &[Policy::Reactive], None, false).unwrap();
        let r = report(&sim, Policy::Reactive);
        assert!(r.broken_flows > 0, "{r:?}");
    }

    #[test]
    fn draining_nodes_hand_their_long_flows_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = small(dir.path());
        s.events.clear();
        s.migration.min_age_s = 0.0;
        let sim = simulate(&s, &[Policy::Reactive], None, false).unwrap();
        let r = report(&sim, Policy::Reactive);
        assert!(r.handoffs_started > 0, "{r:?}");
        assert!(r.flows_moved_with_handoff > 0, "{r:?}");
        assert!(r.flows_moved_with_handoff <= r.handoffs_started, "{r:?}");
        assert_eq!(
            r.handoff_state_bytes,
            r.handoffs_started * s.migration.state_bytes
        );
        s.migration.hand_off = false;
        let sim = simulate(&s, &[Policy::Reactive], None, false).unwrap();
        let without = report(&sim, Policy::Reactive);
        assert_eq!(without.flows_moved_with_handoff, 0);
        assert!(without.node_hours >= r.node_hours, "{without:?} vs {r:?}");
    }

    #[test]
    fn a_short_load_curve_is_refused_with_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = small(dir.path());
        s.duration_hours = 24.0 * 30.0;
        let err = simulate(&s, &[Policy::Static], None, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cover 6.0 days"), "{err}");
    }

    #[test]
    fn delay_quantiles_follow_the_weights() {
        let mut h = DelayHistogram::new();
        h.add(0.0, 98.0);
        h.add(0.010, 1.0);
        h.add(1.0, 1.0);
        assert_eq!(h.quantile_ms(0.5), 0.0);
        let p99 = h.quantile_ms(0.99);
        assert!((10.0..12.0).contains(&p99), "{p99}");
        assert!(h.quantile_ms(0.999) >= 1000.0);
    }

    #[test]
    fn a_sharded_flow_sends_one_packet_per_group_member_each_for_its_share() {
        let flow = |id: u64, class: Class, start_s: f64, end_s: f64, seen: bool| SimFlow {
            id,
            class,
            proto: ipproto::TCP,
            server_port: 443,
            template: 0,
            pps: 100.0,
            start_s,
            end_s,
            node: seen.then_some(0),
            shard: 0,
            hand_off_to: None,
        };
        let (start_s, dt) = (6000.0, 600.0);
        let flows = [
            flow(1, Class::Video, 5000.0, 9000.0, true),
            flow(2, Class::Video, 5000.0, 6300.0, true),
            flow(3, Class::Web, 5000.0, 9000.0, true),
            flow(4, Class::Video, 6100.0, 9000.0, false),
        ];
        let mut groups = [1u8; Class::COUNT];
        groups[Class::Video as usize] = 4;
        let mut order = Vec::new();
        schedule_packets(&flows, &groups, start_s, dt, &mut order);
        let of =
            |i: usize| -> Vec<TickPacket> { order.iter().copied().filter(|p| p.1 == i).collect() };
        assert!(order.windows(2).all(|w| w[0].0 <= w[1].0), "time order");
        let gap_ns = u64::from(PipelineConfig::default().flowlet_gap_us) * 1000;
        let tick = (start_s * 1e9) as u64..((start_s + dt) * 1e9) as u64;
        // Established, sharded: four ACKs in the tick, flowlets apart, a quarter each.
        let p = of(0);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(
            p.iter().all(|&(at, _, flags, parts)| {
                tick.contains(&at) && flags == 0x10 && parts == 4
            })
        );
        assert!(p.windows(2).all(|w| w[1].0 - w[0].0 > gap_ns), "{p:?}");
        // Ending in the tick: its last packet is the RST at its end, the rest before.
        let p = of(1);
        assert_eq!(p.len(), 4, "{p:?}");
        assert_eq!(p[3].0, (6300.0 * 1e9) as u64);
        assert_eq!(p[3].2, 0x14);
        assert!(p[..3].iter().all(|q| q.2 == 0x10 && q.0 >= tick.start));
        // Not sharded: one packet for all its load.
        assert_eq!(of(2).iter().map(|q| q.3).collect::<Vec<_>>(), [1]);
        // New: its SYN alone, unclassified until the profiler's verdict.
        assert_eq!(of(3), [((6100.0 * 1e9) as u64, 3, 0x02, 1)]);
    }
}
